"""A Docker engine of the template's own: for the compose test and ``make docker-engine``.

The compose test runs a baked project's stack the way its README says, which needs a Docker
engine, the compose and buildx CLI plugins and the base images ``python:X.Y-slim``,
``postgres:NN`` and ``redis:7-alpine``. This module provides all of them on a Debian machine,
from Debian's packages alone:

* the engine (``dockerd``, ``containerd``, ``runc``, ``docker-init``, the ``docker`` CLI) from
  the machine's own suite (``apt-get install docker.io``) when it is missing;
* the compose v2 and buildx plugins from Debian *trixie* (``docker-compose``,
  ``docker-buildx``), downloaded with apt pointed at a private sources list and unpacked into
  a private ``DOCKER_CONFIG/cli-plugins``; the machine's apt configuration is not changed;
* a ``dockerd`` of its own: its own data root (kept between runs, so images stay cached), exec
  root, pid file and socket, ``overlay2``, no default bridge, no IP forwarding and no
  masquerading, so containers reach each other and the host but nothing outside the machine;
* base images: pulled when a registry answers, otherwise stand-ins built from a
  ``debootstrap --variant=minbase`` rootfs plus Debian packages, with entrypoints that behave
  like the official images' (see :data:`POSTGRES_ENTRYPOINT`, :data:`REDIS_ENTRYPOINT`). Each
  stand-in carries the hash of its recipe in a label and is rebuilt only when it changes.

A Docker that the machine already runs is never touched: this engine has its own socket, and
``TASKSIGNAL_DOCKER_HOST`` (say ``unix:///var/run/docker.sock`` on a CI runner) makes the
callers use an existing engine instead, which is then neither installed, started nor stopped.

Downloads are cached under ``TASKSIGNAL_DOCKER_CACHE`` (default
``~/.cache/tasksignal-template/docker``): the .deb files, the trixie package lists, the plugins
and the data root. ``make docker-engine-clean`` removes it.

Command line (``make docker-engine`` runs ``prepare``)::

    python scripts/docker_engine.py prepare [IMAGE ...]  # install, start, base images, stop
    python scripts/docker_engine.py start                # leave it running; prints the env
    python scripts/docker_engine.py env                  # export lines for a shell
    python scripts/docker_engine.py stop
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

#: Debian suite of the engine, the stand-in rootfs and their packages; trixie for the plugins.
SUITE: Final = "bookworm"
PLUGIN_SUITE: Final = "trixie"
MIRROR: Final = "http://deb.debian.org/debian"
KEYRING: Final = "/usr/share/keyrings/debian-archive-keyring.gpg"
ENGINE_PACKAGES: Final = ("docker.io",)
ENGINE_PROGRAMS: Final = ("dockerd", "containerd", "runc", "docker-init", "docker")
PLUGIN_PACKAGES: Final = {"docker-compose": "docker-compose", "docker-buildx": "docker-buildx"}
#: PostgreSQL major version of SUITE: the postgres stand-in runs it whatever tag it carries.
SUITE_POSTGRES: Final = "15"
STANDIN_LABEL: Final = "org.tasksignal-template.standin"
RECIPE_LABEL: Final = "org.tasksignal-template.standin.recipe"
#: Bump to rebuild every stand-in (changes every recipe hash).
RECIPE_VERSION: Final = "1"


class EngineUnavailableError(RuntimeError):
    """Containers cannot run on this machine; the message says why (tests skip with it)."""


class EngineError(RuntimeError):
    """Something that should have worked failed; the message carries the evidence."""


def say(message: str) -> None:
    """Print a progress line (pytest shows it with -s, or in the captured output on failure)."""
    print(f"docker-engine: {message}", file=sys.stderr, flush=True)


def _run(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 900,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``command``; raise :class:`EngineError` with its output when it fails."""
    completed = subprocess.run(
        list(command),
        env=dict(env) if env is not None else None,
        cwd=cwd,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr).decode("utf-8", errors="replace")
        tail = "\n".join(output.splitlines()[-40:])
        raise EngineError(f"`{' '.join(command)}` exited {completed.returncode}:\n{tail}")
    return completed


def default_cache() -> Path:
    """Where downloads, plugins and the data root are kept between runs."""
    configured = os.environ.get("TASKSIGNAL_DOCKER_CACHE")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tasksignal-template" / "docker"


def default_run_dir() -> Path:
    """Short path for the socket, pid file and exec root (socket paths are limited in length)."""
    return Path(tempfile.gettempdir()) / f"tasksignal-docker-{os.getuid()}"


def _ping(socket_path: Path, timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers ``GET /_ping`` on the Unix socket ``socket_path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            client.connect(str(socket_path))
            client.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
    except OSError:
        return False
    return answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n", 1)[0]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it has exited and waits to be reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    if fields[0] == "Z":
        with suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        return False
    return True


@contextmanager
def _services_kept_down() -> Iterator[None]:
    """Keep package scripts from starting services while installing (Debian's policy-rc.d).

    Installing docker.io must not start the machine's own Docker daemon. Debian's maintainer
    scripts ask ``/usr/sbin/policy-rc.d``; exit status 101 means "do not start".
    """
    policy = Path("/usr/sbin/policy-rc.d")
    created = False
    if not policy.exists():
        policy.write_text(
            "#!/bin/sh\n# tasksignal-template: no services during install\nexit 101\n"
        )
        policy.chmod(0o755)
        created = True
    try:
        yield
    finally:
        if created:
            policy.unlink()


@dataclass
class Engine:
    """One Docker engine: ours (started and stopped here) or an existing one (``external``)."""

    cache: Path = field(default_factory=default_cache)
    run_dir: Path = field(default_factory=default_run_dir)
    external: str | None = field(default_factory=lambda: os.environ.get("TASKSIGNAL_DOCKER_HOST"))
    started_here: bool = False

    # --- where things are ---------------------------------------------------------------

    @property
    def data_root(self) -> Path:
        """Images, build cache and volumes; kept between runs."""
        return self.cache / "data"

    @property
    def socket(self) -> Path:
        """The engine's API socket."""
        return self.run_dir / "docker.sock"

    @property
    def pidfile(self) -> Path:
        """The pid file of dockerd."""
        return self.run_dir / "dockerd.pid"

    @property
    def log(self) -> Path:
        """The log of dockerd."""
        return self.run_dir / "dockerd.log"

    @property
    def config_dir(self) -> Path:
        """``DOCKER_CONFIG``: the plugins, and no one's credentials."""
        return self.cache / "config"

    @property
    def bin_dir(self) -> Path:
        """Put first on ``PATH``: ``docker`` there is the CLI that goes with the engine."""
        return self.cache / "bin"

    @property
    def host(self) -> str:
        """``DOCKER_HOST`` of this engine."""
        return self.external or f"unix://{self.socket}"

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) set up to talk to this engine."""
        environment = dict(os.environ if base is None else base)
        environment["DOCKER_HOST"] = self.host
        environment["DOCKER_BUILDKIT"] = "1"
        environment.pop("DOCKER_CONTEXT", None)
        if not self.external:
            environment["DOCKER_CONFIG"] = str(self.config_dir)
            environment["PATH"] = f"{self.bin_dir}{os.pathsep}{environment.get('PATH', '')}"
        return environment

    def docker(
        self, *args: str, timeout: float = 900, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``docker ARGS`` against this engine; raise :class:`EngineError` if it fails."""
        return _run([self.cli(), *args], env=self.env(env), timeout=timeout)

    def cli(self) -> str:
        """The ``docker`` CLI to use: the engine package's own when there is one."""
        for candidate in (self.bin_dir / "docker", Path("/usr/bin/docker")):
            if candidate.exists():
                return str(candidate)
        found = shutil.which("docker")
        if found is None:
            raise EngineUnavailableError("no docker CLI on this machine")
        return found

    # --- installing -----------------------------------------------------------------------

    def preflight(self) -> None:
        """Raise :class:`EngineUnavailableError` when this machine cannot run our engine."""
        if sys.platform != "linux":
            raise EngineUnavailableError(f"containers need Linux; this is {sys.platform}")
        if os.geteuid() != 0:
            raise EngineUnavailableError(
                "dockerd needs root and this runs as uid "
                f"{os.geteuid()}; or set TASKSIGNAL_DOCKER_HOST to an engine you may use"
            )
        filesystems = Path("/proc/filesystems").read_text(encoding="utf-8")
        if "overlay" not in filesystems.split():
            with suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
            if "overlay" not in Path("/proc/filesystems").read_text(encoding="utf-8").split():
                raise EngineUnavailableError("the kernel has no overlay filesystem (overlay2)")
        if not Path("/sys/fs/cgroup").is_dir():
            raise EngineUnavailableError("no cgroup filesystem at /sys/fs/cgroup")

    def install(self) -> None:
        """Install the engine and the plugins from Debian's packages where they are missing."""
        if self.external:
            return
        self.preflight()
        missing = [program for program in ENGINE_PROGRAMS if not _which(program)]
        if missing:
            say(f"installing {', '.join(ENGINE_PACKAGES)} with apt (missing: {missing})")
            self._apt_install(ENGINE_PACKAGES)
            still = [program for program in ENGINE_PROGRAMS if not _which(program)]
            if still:
                raise EngineError(f"after installing docker.io these are still missing: {still}")
        # The CLI that came with the engine speaks its API version; another one may not.
        cli = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else _which("docker")
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        link = self.bin_dir / "docker"
        if cli and (not link.is_symlink() or str(link.readlink()) != cli):
            link.unlink(missing_ok=True)
            link.symlink_to(cli)
        self._install_plugins()

    def _apt_install(self, packages: Iterable[str]) -> None:
        if not shutil.which("apt-get"):
            raise EngineUnavailableError(
                f"{' '.join(packages)} missing and no apt-get to install it with"
            )
        archives = self.cache / "debs" / SUITE
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        options = ["-o", f"Dir::Cache::Archives={archives}/"]
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        with _services_kept_down():
            try:
                _run(
                    ["apt-get", *options, "install", "-y", "--no-install-recommends", *packages],
                    env=environment,
                )
            except EngineError:
                # The package lists may be missing or stale (a fresh machine): refresh once.
                _run(["apt-get", "update"], env=environment)
                _run(
                    ["apt-get", *options, "install", "-y", "--no-install-recommends", *packages],
                    env=environment,
                )

    def _plugins_work(self) -> bool:
        environment = self.env()
        for plugin in ("compose", "buildx"):
            completed = subprocess.run(
                [self.cli(), plugin, "version"],
                env=environment,
                capture_output=True,
                check=False,
                timeout=60,
            )
            if completed.returncode != 0:
                return False
        return True

    def _install_plugins(self) -> None:
        if self._plugins_work():
            return
        if not shutil.which("dpkg-deb") or not shutil.which("apt-get"):
            raise EngineUnavailableError("the compose plugin is missing and there is no apt/dpkg")
        say(f"downloading {', '.join(PLUGIN_PACKAGES)} from Debian {PLUGIN_SUITE}")
        apt = self.cache / f"apt-{PLUGIN_SUITE}"
        for folder in ("lists/partial", "archives/partial", "etc/parts", "etc/prefs"):
            (apt / folder).mkdir(parents=True, exist_ok=True)
        sources = apt / "etc" / "sources.list"
        sources.write_text(f"deb [signed-by={KEYRING}] {MIRROR} {PLUGIN_SUITE} main\n")
        options = [
            "-o", f"Dir::Etc::SourceList={sources}",
            "-o", f"Dir::Etc::SourceParts={apt / 'etc' / 'parts'}",
            "-o", f"Dir::Etc::PreferencesParts={apt / 'etc' / 'prefs'}",
            "-o", f"Dir::State::Lists={apt / 'lists'}",
            "-o", f"Dir::Cache={apt}",
            "-o", f"Dir::Cache::Archives={apt / 'archives'}/",
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip
        debs = self.cache / "debs" / PLUGIN_SUITE
        debs.mkdir(parents=True, exist_ok=True)
        wanted = [name for name in PLUGIN_PACKAGES if not list(debs.glob(f"{name}_*.deb"))]
        if wanted:
            _run(["apt-get", *options, "update"])
            _run(["apt-get", *options, "download", *wanted], cwd=debs)
        plugins = self.config_dir / "cli-plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        for package, binary in PLUGIN_PACKAGES.items():
            deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
            with tempfile.TemporaryDirectory() as unpacked:
                _run(["dpkg-deb", "-x", str(deb), unpacked])
                source = Path(unpacked) / "usr" / "libexec" / "docker" / "cli-plugins" / binary
                shutil.copy2(source, plugins / binary)
        if not self._plugins_work():
            raise EngineError("the compose and buildx plugins were unpacked but do not run")

    # --- running ----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start our dockerd unless one of ours already answers; wait until it does."""
        if self.external:
            if not _ping_host(self.external):
                raise EngineUnavailableError(f"no Docker engine answers at {self.external}")
            return
        self.install()
        if _ping(self.socket):
            say(f"reusing the engine already running at {self.socket}")
            return
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_pidfile()
        command = [
            _which("dockerd") or "dockerd",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.run_dir / "exec"),
            "--pidfile", str(self.pidfile),
            "--host", self.host,
            "--storage-driver", "overlay2",
            # Containers talk to each other and to the host; without forwarding or
            # masquerading nothing they send leaves the machine.
            "--iptables=true", "--ip-masq=false", "--ip-forward=false",
            # No docker0: a Docker the machine runs may own it. Compose makes its own networks.
            "--bridge=none",
            "--log-level=info",
        ]  # fmt: skip
        say(f"starting dockerd (data root {self.data_root})")
        with self.log.open("ab") as log:
            subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PATH": _sbin_path()},
            )
        deadline = time.monotonic() + timeout
        while not _ping(self.socket):
            if time.monotonic() > deadline:
                self.stop()
                raise EngineError(
                    f"dockerd did not answer within {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)
        self.started_here = True

    def _remove_stale_pidfile(self) -> None:
        with suppress(OSError, ValueError):
            pid = int(self.pidfile.read_text().strip())
            if not _alive(pid):
                self.pidfile.unlink()

    def log_tail(self, lines: int = 30) -> str:
        """The end of dockerd's log."""
        with suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 45.0) -> None:
        """Stop our dockerd (it stops its containers and containerd first); keep the data root."""
        if self.external:
            return
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if not pid or not _alive(pid):
            self._unmount_leftovers()  # no dockerd of ours runs: whatever is mounted is stale
            return
        say("stopping dockerd")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            say(f"dockerd did not stop within {timeout:.0f} s; killing it")
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            time.sleep(1)
        self._unmount_leftovers()
        _remove_iptables_leftovers()
        self.started_here = False

    def _unmount_leftovers(self) -> None:
        """Unmount what dockerd leaves mounted: ``netns/default``; overlays if it was killed."""
        roots = (str(self.run_dir), str(self.data_root))
        mounts = Path("/proc/self/mounts").read_text().splitlines()
        points = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
        for point in sorted((p for p in points if p.startswith(roots)), reverse=True):
            with suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    # --- images -----------------------------------------------------------------------------

    def image_label(self, reference: str, label: str) -> str | None:
        """The value of ``label`` on the local image ``reference``; ``None`` if there is none."""
        completed = subprocess.run(
            [self.cli(), "image", "inspect", "--format", "{{json .Config.Labels}}", reference],
            env=self.env(),
            capture_output=True,
            check=False,
            timeout=60,
        )
        if completed.returncode != 0:
            return None
        labels = json.loads(completed.stdout or b"null") or {}
        return str(labels.get(label, ""))

    def ensure_images(self, references: Iterable[str]) -> dict[str, str]:
        """Make each base image available; return how (``present``, ``pulled``, ``stand-in``)."""
        how = {}
        for reference in references:
            label = self.image_label(reference, RECIPE_LABEL)
            if label == "":
                how[reference] = "present"  # a real image (no stand-in label)
                continue
            if label is None and self._pull(reference):
                how[reference] = "pulled"
                continue
            recipe = standin_recipe(reference)
            if label == recipe.digest():
                how[reference] = "present"  # our stand-in, built from this very recipe
                continue
            say(f"{reference} cannot be pulled: building a stand-in from Debian {SUITE}")
            self.build_standin(reference, recipe)
            how[reference] = "stand-in"
        return how

    def _pull(self, reference: str) -> bool:
        pulled = subprocess.run(
            [self.cli(), "pull", "--quiet", reference],
            env=self.env(),
            capture_output=True,
            check=False,
            timeout=600,
        )
        return pulled.returncode == 0

    def ensure_rootfs(self) -> str:
        """The ``debootstrap --variant=minbase`` image every stand-in builds on; built once."""
        tag = f"tasksignal-standin/debian:{SUITE}-minbase-{ROOTFS_DIGEST}"
        if self.image_label(tag, STANDIN_LABEL) is not None:
            return tag
        if not shutil.which("debootstrap"):
            say("installing debootstrap with apt")
            self._apt_install(["debootstrap"])
        say(f"debootstrap --variant=minbase {SUITE} (about 30 s)")
        with tempfile.TemporaryDirectory(dir=self.cache) as scratch:
            rootfs = Path(scratch) / "rootfs"
            _run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), MIRROR], timeout=1800)
            # As in Debian's own images: package scripts never start services in a build.
            policy = rootfs / "usr" / "sbin" / "policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            for cached in (rootfs / "var" / "cache" / "apt" / "archives").glob("*.deb"):
                cached.unlink()
            shutil.rmtree(rootfs / "var" / "lib" / "apt" / "lists", ignore_errors=True)
            (rootfs / "var" / "lib" / "apt" / "lists" / "partial").mkdir(parents=True)
            archive = Path(scratch) / "rootfs.tar"
            _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(archive), "."])
            self.docker(
                "import",
                "--change", f"LABEL {STANDIN_LABEL}=rootfs",
                "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change", 'CMD ["bash"]',
                str(archive),
                tag,
            )  # fmt: skip
        return tag

    def build_standin(self, reference: str, recipe: Recipe) -> None:
        """Build the stand-in for ``reference`` from ``recipe`` and tag it ``reference``."""
        base = self.ensure_rootfs()
        with tempfile.TemporaryDirectory(dir=self.cache) as context:
            recipe.write_context(Path(context), base)
            self.docker(
                "build",
                "--network", "host",
                "--label", f"{STANDIN_LABEL}={recipe.kind}",
                "--label", f"{RECIPE_LABEL}={recipe.digest()}",
                "--tag", reference,
                context,
                timeout=1800,
            )  # fmt: skip


#: The iptables rules and chains dockerd adds and leaves behind when it stops.
IPTABLES_LEFTOVERS: Final = (
    ("filter", ["-D", "FORWARD", "-j", "DOCKER-USER"]),
    ("filter", ["-D", "FORWARD", "-j", "DOCKER-ISOLATION-STAGE-1"]),
    ("nat", ["-D", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DOCKER"]),
    ("nat", ["-D", "OUTPUT", "!", "-d", "127.0.0.0/8", "-m", "addrtype", "--dst-type", "LOCAL",
             "-j", "DOCKER"]),
    ("filter", ["-F", "DOCKER-USER"]), ("filter", ["-X", "DOCKER-USER"]),
    ("filter", ["-F", "DOCKER-ISOLATION-STAGE-1"]), ("filter", ["-X", "DOCKER-ISOLATION-STAGE-1"]),
    ("filter", ["-F", "DOCKER-ISOLATION-STAGE-2"]), ("filter", ["-X", "DOCKER-ISOLATION-STAGE-2"]),
    ("filter", ["-F", "DOCKER"]), ("filter", ["-X", "DOCKER"]),
    ("nat", ["-F", "DOCKER"]), ("nat", ["-X", "DOCKER"]),
)  # fmt: skip


def _remove_iptables_leftovers() -> None:
    """Remove dockerd's chains, unless another dockerd (not ours) runs and still uses them."""
    if not shutil.which("iptables", path=_sbin_path()):
        return
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with suppress(OSError, ValueError):
            if comm.read_text().strip() == "dockerd" and _alive(int(comm.parent.name)):
                return
    for table, rule in IPTABLES_LEFTOVERS:
        with suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["iptables", "-w", "-t", table, *rule],
                capture_output=True,
                check=False,
                env={**os.environ, "PATH": _sbin_path()},
            )


def _which(program: str) -> str | None:
    return shutil.which(program, path=_sbin_path())


def _sbin_path() -> str:
    path = os.environ.get("PATH", "")
    extra = [folder for folder in ("/usr/local/sbin", "/usr/sbin", "/sbin") if folder not in path]
    return os.pathsep.join([path, *extra]) if path else os.pathsep.join(extra)


def _ping_host(host: str) -> bool:
    if host.startswith("unix://"):
        return _ping(Path(host.removeprefix("unix://")))
    return True  # a TCP or SSH engine: let the first docker command tell


# --- stand-in recipes -----------------------------------------------------------------------

ROOTFS_DIGEST: Final = hashlib.sha256(
    f"{RECIPE_VERSION} {SUITE} minbase {MIRROR} policy-rc.d".encode()
).hexdigest()[:12]

#: The official postgres image's entrypoint, in short: initialise PGDATA once from
#: POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB with a first start on the Unix socket only
#: (nothing on TCP can mistake it for the real server), run as the postgres user.
POSTGRES_ENTRYPOINT: Final = r"""#!/bin/sh
# Stand-in for the official postgres image's docker-entrypoint.sh (template tests only).
set -eu
if [ "${1#-}" != "$1" ]; then set -- postgres "$@"; fi
if [ "$1" = postgres ] && [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "${POSTGRES_HOST_AUTH_METHOD:-}" != trust ]; then
        echo "error: the database is uninitialized and POSTGRES_PASSWORD is not set" >&2
        exit 1
    fi
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    pwfile="$(mktemp)"
    printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$pwfile"
    # shellcheck disable=SC2086
    initdb --username="$user" --pwfile="$pwfile" ${POSTGRES_INITDB_ARGS:-} -D "$PGDATA"
    rm -f "$pwfile"
    printf "listen_addresses = '*'\n" >> "$PGDATA/postgresql.conf"
    printf 'host all all all %s\n' "${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" \
        >> "$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
    if [ "$db" != postgres ]; then
        echo 'CREATE DATABASE :"db";' \
            | psql -v ON_ERROR_STOP=1 --username "$user" --no-password --dbname postgres \
                   --set db="$db"
    fi
    for script in /docker-entrypoint-initdb.d/*; do
        case "$script" in
            *.sh) . "$script" ;;
            *.sql) psql -v ON_ERROR_STOP=1 --username "$user" --dbname "$db" -f "$script" ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop
    echo "PostgreSQL init process complete; ready for start up."
fi
exec "$@"
"""

#: The official redis image's entrypoint, in short: run as the redis user in /data, with
#: protected mode off (the official image compiles that default in).
REDIS_ENTRYPOINT: Final = r"""#!/bin/sh
# Stand-in for the official redis image's docker-entrypoint.sh (template tests only).
set -eu
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi
case "${2:-}" in -v|--version|-h|--help) exec "$@" ;; esac
if [ "$1" = redis-server ]; then
    shift
    if [ "$#" -gt 0 ] && [ "${1%.conf}" != "$1" ]; then
        conf="$1"
        shift
        set -- redis-server "$conf" --protected-mode no "$@"
    else
        set -- redis-server --protected-mode no "$@"
    fi
fi
exec "$@"
"""

_APT = (
    "RUN apt-get update \\\n"
    " && apt-get install -y --no-install-recommends {packages} \\\n"
    " && rm -rf /var/lib/apt/lists/*\n"
)

#: What a Python built elsewhere (pyenv, python.org) needs at run time on Debian.
PYTHON_RUNTIME_PACKAGES: Final = (
    "ca-certificates netbase tzdata libssl3 libffi8 libsqlite3-0 libbz2-1.0 liblzma5 "
    "libreadline8 libncursesw6 libexpat1 libuuid1 libgdbm6 libnsl2 libtirpc3 zlib1g"
)

#: Parts of a Python installation the stand-in leaves out (tests, GUI, installed packages).
PYTHON_SKIPPED: Final = re.compile(
    r"^lib/python\d\.\d+/(test|idlelib|tkinter|turtledemo|lib2to3/tests|config-[^/]+"
    r"|site-packages/.+)(/|$)|^bin/(?!python\d\.\d+$)|^(include|share)(/|$)"
)


@dataclass
class Recipe:
    """How to build the stand-in for one image reference."""

    kind: str
    dockerfile: str
    files: dict[str, bytes] = field(default_factory=dict)
    #: Host directories added to the context as tar files: name -> (root, identity).
    trees: dict[str, tuple[Path, str]] = field(default_factory=dict)

    def digest(self) -> str:
        """Hash of everything that goes into the image (the base rootfs included)."""
        hasher = hashlib.sha256(f"{RECIPE_VERSION} {ROOTFS_DIGEST}\n{self.dockerfile}".encode())
        for name in sorted(self.files):
            hasher.update(name.encode() + b"\0" + self.files[name] + b"\0")
        for name in sorted(self.trees):
            hasher.update(f"{name}\0{self.trees[name][1]}\0".encode())
        return hasher.hexdigest()[:16]

    def write_context(self, context: Path, base: str) -> None:
        """Write the build context: the Dockerfile, the files and the tar files."""
        (context / "Dockerfile").write_text(self.dockerfile.replace("{base}", base))
        for name, content in self.files.items():
            path = context / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            if name.endswith(".sh"):
                path.chmod(0o755)
        for name, (root, _identity) in self.trees.items():
            with tarfile.open(context / name, "w") as archive:
                for path in sorted(root.rglob("*")):
                    relative = path.relative_to(root).as_posix()
                    if not PYTHON_SKIPPED.search(relative):
                        archive.add(path, arcname=relative, recursive=False)


def host_ca_certificates() -> dict[str, bytes]:
    """The host's local CA certificates (a TLS-inspecting proxy's), for pip inside builds.

    They go into the stand-in's build context only, under the cache: never into a repository.
    """
    folder = Path("/usr/local/share/ca-certificates")
    return {
        f"ca-certificates/{path.name}": path.read_bytes() for path in sorted(folder.glob("*.crt"))
    }


def _python_prefix(version: str) -> Path | None:
    """A self-contained Python ``version`` on this machine (pyenv, python.org), or ``None``."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    candidates = sorted(
        (pyenv_root / "versions").glob(f"{version}.*/bin/python{version}"),
        key=lambda path: [int(part) for part in re.findall(r"\d+", path.parent.parent.name)],
    )
    candidates.append(Path(f"/usr/local/bin/python{version}"))
    for binary in reversed(candidates):
        prefix = binary.parent.parent
        if binary.is_file() and (prefix / "lib" / f"python{version}" / "os.py").is_file():
            return prefix
    return None


def python_recipe(version: str) -> Recipe:
    """``python:X.Y-slim``: ``/usr/local/bin/python`` X.Y with pip and venv, like the official."""
    certificates = host_ca_certificates()
    trust = (
        "COPY ca-certificates/ /usr/local/share/ca-certificates/\nRUN update-ca-certificates\n"
        if certificates
        else ""
    )
    environment = (
        "ENV LANG=C.UTF-8 \\\n"
        "    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \\\n"
        "    PIP_CERT=/etc/ssl/certs/ca-certificates.crt\n"
    )
    prefix = _python_prefix(version)
    if prefix is not None:
        binary = prefix / "bin" / f"python{version}"
        identity = f"{prefix} {binary.stat().st_size} {binary.stat().st_mtime_ns}"
        dockerfile = (
            "FROM {base}\n"
            + _APT.format(packages=PYTHON_RUNTIME_PACKAGES)
            + trust
            + "ADD python.tar /usr/local/\n"
            + "RUN set -eux; ldconfig; cd /usr/local/bin; \\\n"
            + f"    ln -sf python{version} python3; ln -sf python3 python; \\\n"
            + f"    python{version} -m ensurepip --default-pip; \\\n"
            + "    python -c 'import ssl, sqlite3, ctypes, venv, zlib'; pip --version\n"
            + environment
            + f"ENV PYTHON_VERSION={version}\n"
            + 'CMD ["python3"]\n'
        )
        return Recipe(
            kind="python",
            dockerfile=dockerfile,
            files=certificates,
            trees={"python.tar": (prefix, identity)},
        )
    if version == "3.11":  # bookworm's own Python
        dockerfile = (
            "FROM {base}\n"
            + _APT.format(packages=f"ca-certificates python{version} python3-pip python3-venv")
            + trust
            + "RUN set -eux; rm -f /usr/lib/python3*/EXTERNALLY-MANAGED; \\\n"
            + f"    ln -sf /usr/bin/python{version} /usr/local/bin/python{version}; \\\n"
            + f"    ln -sf python{version} /usr/local/bin/python3; \\\n"
            + "    ln -sf python3 /usr/local/bin/python; ln -sf /usr/bin/pip3 /usr/local/bin/pip\n"
            + environment
            + 'CMD ["python3"]\n'
        )
        return Recipe(kind="python", dockerfile=dockerfile, files=certificates)
    raise EngineUnavailableError(
        f"no Python {version} on this machine to stand in for python:{version}-slim"
        " (pyenv or /usr/local), and Debian {SUITE} has only 3.11"
    )


def postgres_recipe() -> Recipe:
    """``postgres:NN``: Debian's PostgreSQL with the official image's entrypoint behaviour."""
    bin_dir = f"/usr/lib/postgresql/{SUITE_POSTGRES}/bin"
    dockerfile = (
        "FROM {base}\n"
        "ENV LANG=C.UTF-8\n"
        "RUN set -eux; apt-get update; \\\n"
        "    apt-get install -y --no-install-recommends postgresql-common; \\\n"
        "    sed -ri 's/#?(create_main_cluster) .*$/\\1 = false/' "
        "/etc/postgresql-common/createcluster.conf; \\\n"
        f"    apt-get install -y --no-install-recommends postgresql-{SUITE_POSTGRES}; \\\n"
        "    rm -rf /var/lib/apt/lists/*\n"
        f"ENV PATH=$PATH:{bin_dir} PGDATA=/var/lib/postgresql/data\n"
        "RUN install -d -o postgres -g postgres -m 3777 /var/run/postgresql \\\n"
        " && install -d -o postgres -g postgres -m 1777 /var/lib/postgresql/data\n"
        "COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh\n"
        "VOLUME /var/lib/postgresql/data\n"
        'ENTRYPOINT ["docker-entrypoint.sh"]\n'
        "STOPSIGNAL SIGINT\n"
        "EXPOSE 5432\n"
        'CMD ["postgres"]\n'
    )
    return Recipe(
        kind="postgres",
        dockerfile=dockerfile,
        files={"docker-entrypoint.sh": POSTGRES_ENTRYPOINT.encode()},
    )


def redis_recipe() -> Recipe:
    """``redis:7*``: Debian's redis-server with the official image's entrypoint behaviour."""
    dockerfile = (
        "FROM {base}\n"
        + _APT.format(packages="redis-server")
        + "RUN install -d -o redis -g redis /data\n"
        "WORKDIR /data\n"
        "VOLUME /data\n"
        "COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh\n"
        'ENTRYPOINT ["docker-entrypoint.sh"]\n'
        "EXPOSE 6379\n"
        'CMD ["redis-server"]\n'
    )
    return Recipe(
        kind="redis",
        dockerfile=dockerfile,
        files={"docker-entrypoint.sh": REDIS_ENTRYPOINT.encode()},
    )


def standin_recipe(reference: str) -> Recipe:
    """The recipe that stands in for the image ``reference`` (``python:3.12-slim``, ...).

    >>> standin_recipe("redis:7-alpine").kind
    'redis'
    >>> standin_recipe("postgres:17").kind
    'postgres'
    """
    name, _, tag = reference.partition(":")
    name = name.removeprefix("docker.io/").removeprefix("library/")
    if name == "python":
        match = re.match(r"(\d+\.\d+)", tag)
        if not match:
            raise EngineError(f"cannot tell the Python version of {reference}")
        return python_recipe(match[1])
    if name == "postgres":
        return postgres_recipe()
    if name == "redis":
        return redis_recipe()
    raise EngineError(f"no stand-in recipe for {reference}")


def base_images(project: Path) -> list[str]:
    r"""The images a baked project's Dockerfile and compose.yaml start from (not its own).

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "Dockerfile").write_text("FROM python:3.12-slim AS base\nFROM base\n")
    >>> _ = (folder / "compose.yaml").write_text("services:\n  r:\n    image: redis:7\n")
    >>> base_images(folder)
    ['python:3.12-slim', 'redis:7']
    """
    images: list[str] = []
    stages = set()
    dockerfile = project / "Dockerfile"
    if dockerfile.is_file():
        for match in re.finditer(
            r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile.read_text(), re.MULTILINE | re.I
        ):
            if match[1] not in stages and match[1] not in images:
                images.append(match[1])
            if match[2]:
                stages.add(match[2])
    compose = project / "compose.yaml"
    if compose.is_file():
        for match in re.finditer(r"^\s+image:\s*(\S+)\s*$", compose.read_text(), re.MULTILINE):
            image = match[1]
            if "{" not in image and _is_public(image) and image not in images:
                images.append(image)
    return images


def _is_public(image: str) -> bool:
    """Whether ``image`` names a registry image (``redis:7``), not the project's own build."""
    name = image.partition(":")[0].rsplit("/", 1)[-1]
    return name in {"python", "postgres", "redis"}


# --- command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python scripts/docker_engine.py``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="install, start, make base images, stop")
    prepare.add_argument("images", nargs="*", help="default: the default bake's base images")
    commands.add_parser("start", help="start the engine and leave it running")
    commands.add_parser("stop", help="stop the engine (the data root is kept)")
    commands.add_parser("env", help="print export lines for a shell")
    arguments = parser.parse_args(argv)
    engine = Engine()
    try:
        if arguments.command == "prepare":
            images = arguments.images or ["python:3.12-slim", "postgres:17", "redis:7-alpine"]
            engine.start()
            try:
                for image, how in engine.ensure_images(images).items():
                    print(f"{image}: {how}")
            finally:
                engine.stop()
        elif arguments.command == "start":
            engine.start()
            _print_env(engine)
        elif arguments.command == "stop":
            engine.stop()
        else:
            _print_env(engine)
    except EngineUnavailableError as error:
        print(f"docker-engine: containers cannot run here: {error}", file=sys.stderr)
        return 3
    except EngineError as error:
        print(f"docker-engine: {error}", file=sys.stderr)
        return 1
    return 0


def _print_env(engine: Engine) -> None:
    environment = engine.env({})
    for name in ("DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_BUILDKIT"):
        if name in environment:
            print(f"export {name}={environment[name]}")
    if "PATH" in environment:
        print(f'export PATH={engine.bin_dir}:"$PATH"')


if __name__ == "__main__":
    sys.exit(main())
