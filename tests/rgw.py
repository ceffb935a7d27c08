"""A real S3 server for tests: Ceph's RADOS gateway, from Debian packages, unprivileged, on 127.0.0.1.

The ``radosgw``, ``ceph-mon`` and ``ceph-osd`` packages (and what they depend on that this system lacks) are
fetched once with ``apt-get download`` into ``$RLR_DIST_CACHE/ceph-debs`` (default ``~/.cache/rlr-dist``) and
unpacked once with ``dpkg -x`` beside them (``ceph-root``); nothing is installed. :class:`RGW` then writes a
``ceph.conf`` under a scratch folder (one monitor, one memstore OSD, cephx off, everything on 127.0.0.1 and
free ports), starts the three daemons as children in one process group of their own, creates an S3 user with
a generated secret and waits until S3 answers. ``stop()``/``start()`` stop and restart only the gateway (the
objects stay in the OSD); ``close()`` kills the process group and removes the scratch folder. The daemons
also die with the thread that started them (``PR_SET_PDEATHSIG``), so a killed test run leaves none behind.

The secret is never printed: it is kept in :attr:`RGW.secret_key`, given to ``radosgw-admin`` on its command
line and nowhere else; ``radosgw-admin``'s answer (which repeats it) is parsed, not shown.
"""
from __future__ import annotations

import json
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from rlr_dist.ports import free_port

PACKAGES = ("radosgw", "ceph-mon", "ceph-osd")
LIB = "usr/lib/x86_64-linux-gnu"
PYTHON = "/usr/bin/python3"  # the `ceph` CLI is Python, with bindings built for Debian's python3


class RGWError(RuntimeError):
    """Bring-up failed; the message says which step, with the tail of its output or log."""



def cache_dir() -> Path:
    return Path(os.environ.get("RLR_DIST_CACHE", Path.home() / ".cache" / "rlr-dist"))


def _run(args: list, env: dict, what: str, timeout: float = 120, cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RGWError(f"{what}: {e}") from None
    if p.returncode:
        raise RGWError(f"{what}: exit {p.returncode}: {(p.stderr or p.stdout)[-2000:]}")
    return p.stdout


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished ``tmp`` to ``final``; another process that got there first is fine."""
    shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / ".complete").is_file():
            raise


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it ends (a killed test run leaves no
    daemons behind). So :meth:`RGW.start` must be called from a thread that outlives the gateway."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def fetch_debs(folder: Path, say=print) -> Path:
    """The .debs of :data:`PACKAGES` and their missing dependencies in ``folder`` (downloaded if absent)."""
    done = folder / ".complete"
    if done.is_file():
        say(f"[rgw] packages: cached in {folder}")
        return folder
    t = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ceph-debs-", dir=folder.parent))
    try:
        env = {**os.environ, "LC_ALL": "C"}
        plan = _run(["apt-get", "install", "-s", *PACKAGES], env, "apt-get install -s (dependency list)")
        names = [line.split()[1] for line in plan.splitlines() if line.startswith("Inst ")]
        if not names:
            raise RGWError(f"apt-get install -s {' '.join(PACKAGES)} listed no packages to fetch")
        _run(["apt-get", "download", *names], env, "apt-get download", timeout=600, cwd=tmp)
        (tmp / ".complete").write_text("\n".join(names) + "\n")
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"[rgw] packages: downloaded {len(names)} .debs in {time.perf_counter() - t:.1f} s")
    return folder


def unpack(debs: Path, root: Path, say=print) -> Path:
    """Every .deb of ``debs`` unpacked (``dpkg -x``) into ``root``, once."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == (debs / ".complete").read_text():
        say(f"[rgw] unpacked: cached in {root}")
        return root
    t = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ceph-root-", dir=root.parent))
    try:
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(tmp)], os.environ, f"dpkg -x {deb.name}")
        (tmp / ".complete").write_text((debs / ".complete").read_text())
        _publish(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"[rgw] unpacked: {root} in {time.perf_counter() - t:.1f} s")
    return root


CONF = """[global]
fsid = {fsid}
mon_host = v1:127.0.0.1:{mon_port}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr2 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
osd_objectstore = memstore
memstore_device_bytes = {memstore_bytes}
osd_max_object_name_len = 460
osd_max_object_namespace_len = 64
run_dir = {d}/run
crash_dir = {d}/crash
log_file = {d}/log/$name.log
admin_socket = {d}/run/$name.asok
mon_data = {d}/mon/$cluster-$id
osd_data = {d}/osd/$cluster-$id
plugin_dir = {r}/{lib}/ceph
erasure_code_dir = {r}/{lib}/ceph/erasure-code
osd_class_dir = {r}/{lib}/rados-classes

[client.rgw.a]
rgw_frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw_data = {d}/rgw
"""


class RGW:
    """One-node Ceph cluster with a RADOS gateway; see the module docstring. Use as a context manager or
    call :meth:`open` then :meth:`close`."""

    def __init__(self, cache: str | Path | None = None, workdir: str | Path | None = None,
                 memstore_bytes: int = 2 << 30, say=print):
        self.cache = Path(cache) if cache else cache_dir()
        self.workdir = workdir  # the scratch folder is made inside (default: the system's temp folder)
        self.memstore_bytes = memstore_bytes
        self.say = say
        self.access_key = "rlr-" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(30)
        self.times: dict[str, float] = {}
        self.dir: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.pgid: int | None = None

    def __repr__(self) -> str:  # never the secret
        return f"RGW(endpoint={getattr(self, 'endpoint', None)!r}, access_key={self.access_key!r})"

    def __enter__(self) -> "RGW":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- helpers
    def _phase(self, name: str, t: float) -> None:
        self.times[name] = time.perf_counter() - t
        self.say(f"[rgw] {name}: {self.times[name]:.1f} s")

    def _ceph(self, *args: str, what: str, timeout: float = 60) -> str:
        return _run([PYTHON, str(self.root / "usr/bin/ceph"), "-c", str(self.conf), "--connect-timeout", "30",
                     *args], self.env, what, timeout)

    def _spawn(self, name: str, args: list) -> subprocess.Popen:
        log = open(self.dir / "log" / f"{name}.out", "ab")
        kw = {"process_group": self.pgid or 0}  # the first one leads a new group; the rest join it
        p = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent, **kw)
        log.close()
        if self.pgid is None:
            self.pgid = p.pid
        self.procs[name] = p
        return p

    def _tail(self, name: str, n: int = 1500) -> str:
        text = ""
        for f in (self.dir / "log" / f"{name}.out", *sorted((self.dir / "log").glob(f"*{name}*.log"))):
            if f.is_file():
                text += f.read_text(errors="replace")[-n:]
        return text.replace(self.secret_key, "***")

    def _wait(self, name: str, ready, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            p = self.procs.get(name)
            if p is not None and p.poll() is not None:
                raise RGWError(f"{name} exited with {p.returncode}: {self._tail(name)}")
            if ready():
                return
            time.sleep(0.3)
        raise RGWError(f"{name} not ready after {timeout:.0f} s: {self._tail(name)}")

    def _s3_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint, timeout=2) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            return e.code < 500
        except OSError:
            return False

    # ----------------------------------------------------------------------------------- lifecycle
    def open(self) -> "RGW":
        t0 = time.perf_counter()
        try:
            self._bring_up()
        except BaseException:
            self.close()
            raise
        self.times["total"] = time.perf_counter() - t0
        self.say(f"[rgw] up at {self.endpoint} in {self.times['total']:.1f} s "
                 f"({', '.join(f'{k} {v:.1f} s' for k, v in self.times.items() if k != 'total')})")
        return self

    def _bring_up(self) -> None:
        t = time.perf_counter()
        debs = fetch_debs(self.cache / "ceph-debs", self.say)
        self._phase("download", t)
        t = time.perf_counter()
        self.root = unpack(debs, self.cache / "ceph-root", self.say)
        self._phase("unpack", t)
        if not Path(PYTHON).is_file():
            raise RGWError(f"{PYTHON} is needed for the `ceph` command line (Debian's python3)")

        r = self.root
        self.dir = Path(tempfile.mkdtemp(prefix="rlr-rgw-", dir=self.workdir))
        d = self.dir
        for sub in ("run", "log", "mon", "osd", "rgw", "crash"):
            (d / sub).mkdir()
        self.env = {**os.environ,
                    "LD_LIBRARY_PATH": f"{r}/{LIB}:{r}/{LIB}/ceph:{r}/lib/x86_64-linux-gnu",
                    "PATH": f"{r}/usr/bin:{r}/usr/sbin:{os.environ.get('PATH', '/usr/bin:/bin')}",
                    "PYTHONPATH": f"{r}/usr/lib/python3/dist-packages", "CEPH_CONF": str(d / "ceph.conf")}
        self.env.pop("PYTHONHOME", None)
        self.env.pop("VIRTUAL_ENV", None)
        self.mon_port, self.rgw_port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
        fsid = str(uuid.uuid4())
        self.conf = d / "ceph.conf"
        self.conf.write_text(CONF.format(fsid=fsid, mon_port=self.mon_port, rgw_port=self.rgw_port, d=d, r=r,
                                         lib=LIB, memstore_bytes=self.memstore_bytes))
        bin_ = r / "usr/bin"
        c = ["-c", str(self.conf)]

        t = time.perf_counter()
        _run([bin_ / "ceph-authtool", "--create-keyring", d / "keyring", "--gen-key", "-n", "mon.",
              "--cap", "mon", "allow *"], self.env, "ceph-authtool")
        _run([bin_ / "monmaptool", "--create", "--addv", "a", f"[v1:127.0.0.1:{self.mon_port}]", "--fsid", fsid,
              d / "monmap"], self.env, "monmaptool")
        _run([bin_ / "ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", d / "monmap", "--keyring", d / "keyring"],
             self.env, "ceph-mon --mkfs")
        self._spawn("mon", [bin_ / "ceph-mon", *c, "-i", "a", "-f"])
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid, what="ceph osd new").strip()
        self._phase("mon", t)

        t = time.perf_counter()
        (d / "osd" / f"ceph-{osd_id}").mkdir()
        _run([bin_ / "ceph-osd", *c, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid], self.env, "ceph-osd --mkfs")
        self._spawn("osd", [bin_ / "ceph-osd", *c, "-i", osd_id, "-f"])
        self._wait("osd", lambda: json.loads(self._ceph("osd", "stat", "-f", "json", what="ceph osd stat"))
                   .get("num_up_osds", 0) >= 1, 90)
        self._phase("osd", t)

        t = time.perf_counter()
        self.start()
        admin = [bin_ / "radosgw-admin", *c, "-n", "client.rgw.a"]
        out = _run([*admin, "user", "create", "--uid=rlr-test", "--display-name=rlr-test",
                    f"--access-key={self.access_key}", f"--secret-key={self.secret_key}"], self.env,
                   "radosgw-admin user create")
        keys = json.loads(out).get("keys", [])
        if not any(k.get("access_key") == self.access_key for k in keys):
            raise RGWError("radosgw-admin user create: the user has not the requested access key")
        self._phase("rgw", t)

    def start(self) -> None:
        """Start the gateway (again) on the same port and wait until S3 answers."""
        if self.running:
            return
        t = time.perf_counter()
        self._spawn("rgw", [self.root / "usr/bin/radosgw", "-c", str(self.conf), "-n", "client.rgw.a", "-f"])
        self._wait("rgw", self._s3_answers, 120)
        self.say(f"[rgw] radosgw answering at {self.endpoint} after {time.perf_counter() - t:.1f} s")

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 15) -> None:
        """Stop the gateway only (default: killed, as a crash would); mon and OSD keep the objects."""
        p = self.procs.pop("rgw", None)
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        self.say(f"[rgw] radosgw stopped ({signal.Signals(sig).name})")

    def freeze(self) -> None:
        """SIGSTOP the gateway: connections are still accepted (by the kernel) but never answered."""
        self.procs["rgw"].send_signal(signal.SIGSTOP)
        self.say("[rgw] radosgw frozen (SIGSTOP)")

    def thaw(self) -> None:
        self.procs["rgw"].send_signal(signal.SIGCONT)
        self.say("[rgw] radosgw thawed (SIGCONT)")

    @property
    def running(self) -> bool:
        p = self.procs.get("rgw")
        return p is not None and p.poll() is None

    def close(self) -> None:
        """Kill every daemon (their process group) and remove the scratch folder."""
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError):  # the group may be gone already
                os.killpg(self.pgid, signal.SIGKILL)
            for p in self.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILLed: reaped, or left to init
                    p.wait(10)
            self.pgid = None
        self.procs.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
