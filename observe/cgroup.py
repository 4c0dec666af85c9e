"""Which container and pod a process runs in, from its cgroup.

The kubelet and the container runtimes name cgroups after what they hold, so a process's
cgroup path names its pod (``pod<UID>``) and its container (the runtime's 64-hex id). The
path styles seen in the wild, all handled here:

- systemd driver (cgroup v1 and v2): ``/kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid with _>.slice/<runtime>-<id>.scope`` with ``cri-containerd-``,
  ``crio-`` (CRI-O's ``crio-conmon-`` monitor is *not* the container), ``docker-`` or
  ``libpod-`` (podman); guaranteed pods sit directly under ``kubepods.slice``; kind nests
  everything under ``kubelet.slice/kubelet-kubepods.slice``; CRI-O's sandbox cgroup may lack
  the ``.scope`` suffix;
- containerd's systemd driver as some nodes show it in cgroup v1 hierarchies:
  ``.../kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`` (the ``slice:prefix:name``
  form written verbatim);
- cgroupfs driver: ``/kubepods/burstable/pod<uid>/<id>`` (guaranteed: ``/kubepods/pod<uid>/
  <id>``), plain Docker ``/docker/<id>``;
- a cgroup namespace shows paths relative to the reader's root (``/../../kubepods...``), and
  a node inside a container (kind, minikube) prefixes the outer container's path: the
  innermost container component wins.

Static pods carry the kubelet's config hash (32 hex digits, no dashes) in the path, not the
API's UID: such a pod UID matches no inventory pod.

:class:`ProcessCgroups` resolves a process (pid, and the cgroup v2 id the kernel reported
with the event) to a :class:`ContainerRef`, caching by cgroup id: the cgroup directory
outlives the short-lived processes an eBPF tracer reports after they exited.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from observe.inventory import Inventory

#: Runtimes named by a path component's prefix (``<prefix>-<id>[.scope]`` or ``:<prefix>:<id>``).
RUNTIME_PREFIXES = {
    "cri-containerd": "containerd",
    "crio": "cri-o",
    "docker": "docker",
    "libpod": "podman",
}

#: Seconds a pid whose /proc entry was gone is not looked up again.
DEAD_PID_S = 10.0
#: Environment variable naming the node's cgroup v2 mount (see :class:`ProcessCgroups`).
CGROUP_ROOT_ENV = "MESHWRIGHT_CGROUP_ROOT"

_UID = (r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
        r"|[0-9a-f]{32}")
_POD = re.compile(rf"(?:^|[/-])pod(?P<uid>{_UID})(?=\.slice|/|:|$)")
_ID = r"[0-9a-f]{64}"
_SCOPE = re.compile(rf"^(?P<prefix>[a-z-]+?)-(?P<id>{_ID})(?:\.scope)?$")
_COLON = re.compile(rf":(?P<prefix>[a-z-]+):(?P<id>{_ID})$")
_BARE = re.compile(rf"^{_ID}$")


@dataclass(frozen=True)
class ContainerRef:
    """What a cgroup path says about the process in it."""

    container_id: str | None
    """The runtime's container id (64 hex digits); None when the path names a pod only."""
    runtime: str | None
    """``containerd`` | ``cri-o`` | ``docker`` | ``podman``; None when the style hides it."""
    pod_uid: str | None
    """Kubernetes pod UID with dashes (``metadata.uid``); None outside a pod."""


def parse_cgroup_path(path: str) -> ContainerRef | None:
    """The container and pod a cgroup path names; None when it names neither."""
    path = path.strip()
    if not path:
        return None
    uid = None
    for m in _POD.finditer(path):
        uid = m.group("uid")  # the innermost pod wins (a node inside a container)
    container, runtime = _container(path)
    if uid is None and container is None:
        return None
    if uid is not None:
        uid = uid.replace("_", "-")
    return ContainerRef(container_id=container, runtime=runtime, pod_uid=uid)


def _container(path: str) -> tuple[str | None, str | None]:
    m = _COLON.search(path)
    if m:
        return m.group("id"), RUNTIME_PREFIXES.get(m.group("prefix"))
    parts = [p for p in path.split("/") if p and p != ".."]
    for i in range(len(parts) - 1, -1, -1):
        part = parts[i]
        m = _SCOPE.match(part)
        if m:
            prefix = m.group("prefix")
            if prefix == "crio-conmon":
                return None, None  # CRI-O's monitor process: in the pod, not in a container
            if prefix in RUNTIME_PREFIXES:
                return m.group("id"), RUNTIME_PREFIXES[prefix]
            continue
        if _BARE.match(part):
            runtime = "docker" if i > 0 and parts[i - 1] == "docker" else None
            return part, runtime
    return None, None


def parse_proc_cgroup(text: str) -> ContainerRef | None:
    """The container and pod of a ``/proc/<pid>/cgroup`` file (cgroup v1 and/or v2 lines).

    Lines are ``hierarchy-id:controllers:path``. The first line naming both a container and
    a pod wins, else the first naming either (v1 hosts may leave some hierarchies at ``/``).
    """
    best: ContainerRef | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        ref = parse_cgroup_path(parts[2])
        if ref is None:
            continue
        if ref.container_id and ref.pod_uid:
            return ref
        if best is None:
            best = ref
    return best


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or, on hybrid hosts,
    ``/sys/fs/cgroup/unified``); None without one."""
    try:
        text = Path(mountinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            fields = left.split(" ")
            if len(fields) >= 5:
                return Path(fields[4].replace("\\040", " "))
    return None


class ProcessCgroups:
    """(pid, cgroup id) -> :class:`ContainerRef`, cached.

    ``cgroup_root`` defaults to ``$MESHWRIGHT_CGROUP_ROOT`` (a pod with its own cgroup
    namespace sees only its own subtree at /sys/fs/cgroup: mount the node's elsewhere and
    name it there), else the cgroup v2 mount of this process. The cgroup v2 id the kernel
    reports (``bpf_get_current_cgroup_id``) is the inode number of the cgroup's directory
    under the v2 mount: it is looked up by walking that mount
    (again at most once per ``rescan_s`` when an id is new). Without a v2 mount, or when
    the id names no container, ``/proc/<pid>/cgroup`` is read while the process lives.
    """

    def __init__(self, *, proc_root: str | Path = "/proc", cgroup_root: str | Path | None = None,
                 rescan_s: float = 1.0) -> None:
        self.proc_root = Path(proc_root)
        if cgroup_root is None and os.environ.get(CGROUP_ROOT_ENV):
            cgroup_root = os.environ[CGROUP_ROOT_ENV]
        root = Path(cgroup_root) if cgroup_root is not None else cgroup2_mount()
        self.cgroup_root = root if root is not None and root.is_dir() else None
        self.rescan_s = rescan_s
        self._paths: dict[int, str] = {}
        self._scanned = 0.0
        self._by_cgroup: dict[int, ContainerRef | None] = {}
        self._by_pid: dict[int, ContainerRef | None] = {}
        self._gone: dict[int, float] = {}
        self.proc_reads = 0
        """``/proc/<pid>/cgroup`` files read."""
        self.scans = 0
        """Walks of the cgroup v2 tree."""

    def lookup(self, pid: int, cgroup_id: int = 0) -> ContainerRef | None:
        """The container of process ``pid`` whose cgroup v2 id was ``cgroup_id`` (0: unknown)."""
        if cgroup_id > 1:
            if cgroup_id in self._by_cgroup:
                ref = self._by_cgroup[cgroup_id]
                if ref is not None:
                    return ref
            else:
                path = self._path_of(cgroup_id)
                ref = parse_cgroup_path(path) if path is not None else None
                if path is not None:
                    self._by_cgroup[cgroup_id] = ref
                if ref is not None:
                    return ref
        if pid <= 0:
            return None
        if pid in self._by_pid:
            return self._by_pid[pid]
        now = time.monotonic()
        if self._gone.get(pid, -DEAD_PID_S) > now - DEAD_PID_S:
            return None
        try:
            with open(f"{self.proc_root}/{pid}/cgroup", encoding="utf-8",
                      errors="replace") as fh:
                text = fh.read()
        except OSError:
            # Exited: remembered briefly (a pid is reused only after the kernel wraps around).
            if len(self._gone) > 65536:
                self._gone.clear()
            self._gone[pid] = now
            return None
        self.proc_reads += 1
        ref = parse_proc_cgroup(text)
        if len(self._by_pid) > 65536:
            self._by_pid.clear()
        self._by_pid[pid] = ref
        return ref

    def _path_of(self, cgroup_id: int) -> str | None:
        if self.cgroup_root is None:
            return None
        path = self._paths.get(cgroup_id)
        now = time.monotonic()
        if path is None and now - self._scanned >= self.rescan_s:
            self._scanned = now
            self._paths = dict(_walk(self.cgroup_root))
            self.scans += 1
            path = self._paths.get(cgroup_id)
        return path


def _walk(root: Path) -> Iterable[tuple[int, str]]:
    """(inode, path relative to root with a leading /) of every cgroup directory."""
    stack = [(str(root), "")]
    while stack:
        top, rel = stack.pop()
        try:
            with os.scandir(top) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        sub = f"{rel}/{e.name}"
                        yield e.inode(), sub
                        stack.append((e.path, sub))
        except OSError:
            continue


def pods_by_uid(inventory: Inventory) -> dict[str, str]:
    """Pod UID -> ``'<namespace>/<pod>'`` for every inventory pod that has a UID."""
    return {pod.uid: pod.key for pod in inventory.pods if pod.uid}
