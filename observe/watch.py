"""The inventory kept current by list+watch, as a time-indexed history.

One loop per (resource, scope) of :data:`observe.kube.RESOURCES`: list (paginated) to get the
state and its resourceVersion, then watch from it with bookmarks (``allowWatchBookmarks``), so
a reconnect resumes exactly where the last event or bookmark left off. A watch the server ends
(``timeoutSeconds``) is reopened at once; a dropped connection, a refused one or HTTP 429/5xx is
retried after a :class:`Backoff`; a ``410 Gone`` (the resourceVersion was compacted away) lists
again.

History: every object goes through :meth:`observe.inventory.Inventory.add_object`, so pods keep
their lifetimes (uid -> IPs from ``startTime`` to the end). A ``DELETED`` pod without a
``deletionTimestamp`` ends when the event is seen (``clock``). A pod that vanished while the
watch was down (found missing by the re-list) ends at the re-list time, or earlier at the start
of a newer pod now holding one of its IPs: the reused address then resolves by time to the right
workload. Deleted Services, ServiceAccounts, Namespaces and owners are kept (their last state):
older flows still refer to them.

Restart: :meth:`InventoryWatcher.inventory_state` gives every watch's resourceVersion together
with a compact copy of every object but pods (:func:`compact_object`: only what
``observe.inventory`` reads; deleted ones marked with a ``deletionTimestamp``), consistent with
each other; a watcher built from them (``resource_versions``, ``objects``, and the pod history
as ``pods``) lists nothing and resumes every watch where it stood. A resourceVersion compacted
away meanwhile gets 410 and that scope is listed; objects missing from the list are marked
deleted.

Threads: one per (resource, scope): 10 for ``-A``, 10 per namespace with ``-n``. Memory: the
inventory's records plus a compact copy of each live pod (for its end when it vanishes) and of
every other object (for the checkpoint).
"""

from __future__ import annotations

import copy
import logging
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from observe.errors import InventoryError
from observe.inventory import Inventory, _time
from observe.kube import (
    PAGE_SIZE,
    RESOURCES,
    ApiUnavailable,
    KubeApi,
    ResourceGone,
    resource_path,
)

log = logging.getLogger(__name__)

#: Seconds the server keeps one watch open (it closes it; the loop reopens at once).
WATCH_TIMEOUT = 290
#: Errors kept as samples in :class:`WatchStats`.
MAX_SAMPLES = 10

#: (kind, group/version, resource) of everything watched.
WATCHED: tuple[tuple[str, str, str], ...] = tuple((k, g, r) for k, g, r, _, _ in RESOURCES)

#: Called for every pod event: (``ADDED`` | ``MODIFIED`` | ``DELETED``, raw pod object).
PodListener = Callable[[str, Mapping[str, Any]], None]

#: kind -> resource of everything watched.
RESOURCE_OF = {k: r for k, _, r in WATCHED}
#: Template container fields observe.inventory reads (ports, probes, native sidecars).
_PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
#: The istio-proxy variable that holds the app's original probes.
_PROBERS_ENV = "ISTIO_KUBE_APP_PROBERS"


@dataclass
class Backoff:
    """Reconnect delays: exponential from ``base`` up to ``cap`` seconds, with "equal jitter"
    (a delay lies in [d/2, d]), reproducible with ``seed``. ``max_failures`` consecutive
    failures (None: unbounded) make :meth:`next_delay` raise the caller's error."""

    base: float = 0.5
    cap: float = 30.0
    seed: int | None = None
    max_failures: int | None = None
    failures: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def next_delay(self) -> float | None:
        """The next delay, or None when ``max_failures`` is exhausted."""
        self.failures += 1
        if self.max_failures is not None and self.failures > self.max_failures:
            return None
        ceiling = min(self.cap, self.base * 2 ** (self.failures - 1))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class WatchStats:
    """What the watches did (for metrics and the report)."""

    lists: int = 0
    """Full lists (the first one per stream, then one per 410 Gone)."""
    gone: int = 0
    """410 Gone answers (resourceVersion compacted away)."""
    reconnects: int = 0
    """Watches reopened after an error (not counting server-side timeouts)."""
    events: dict[str, int] = field(default_factory=dict)
    """Events applied by type (ADDED, MODIFIED, DELETED, BOOKMARK)."""
    vanished: int = 0
    """Pods found gone by a re-list (deleted while the watch was down)."""
    vanished_objects: int = 0
    """Other objects found gone by a re-list (marked deleted, kept)."""
    errors: list[str] = field(default_factory=list)
    """A few error messages."""

    def error(self, exc: Exception) -> None:
        if len(self.errors) < MAX_SAMPLES:
            self.errors.append(str(exc))


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def compact_object(obj: Mapping[str, Any], kind: str | None = None) -> dict[str, Any]:
    """A Namespace, Service, ServiceAccount or owner (ReplicaSet, Deployment, ...) cut down to
    what :class:`observe.inventory.Inventory` reads of it, with ``kind`` and ``apiVersion``.
    An object of an unexpected shape is kept whole but for ``managedFields`` (the inventory
    judges it)."""
    kind = str(obj.get("kind") or kind)
    try:
        return _compact(obj, kind)
    except (AttributeError, TypeError, KeyError):
        out = copy.deepcopy(dict(obj))
        if isinstance(out.get("metadata"), dict):
            out["metadata"].pop("managedFields", None)
        out["kind"] = kind
        return out


def _compact(obj: Mapping[str, Any], kind: str) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    out_meta = {k: copy.deepcopy(meta[k]) for k in (
        "name", "namespace", "uid", "labels", "creationTimestamp", "deletionTimestamp")
        if meta.get(k) is not None}
    refs = [{k: r[k] for k in ("kind", "name", "controller") if k in r}
            for r in meta.get("ownerReferences") or []]
    if refs:
        out_meta["ownerReferences"] = refs
    out: dict[str, Any] = {"kind": kind, "apiVersion": obj.get("apiVersion"),
                           "metadata": out_meta}
    spec = obj.get("spec") or {}
    if kind == "Service":
        out["spec"] = {k: copy.deepcopy(spec[k]) for k in (
            "type", "clusterIP", "clusterIPs", "selector", "externalName") if k in spec}
        ports = [{k: p[k] for k in ("name", "port", "targetPort", "protocol", "appProtocol")
                  if k in p} for p in spec.get("ports") or []]
        if ports:
            out["spec"]["ports"] = ports
    elif kind not in ("Namespace", "ServiceAccount"):  # an owner
        template = (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
                    if kind == "CronJob" else spec.get("template")) or {}
        tmeta = template.get("metadata") or {}
        tspec = template.get("spec") or {}
        small = {"metadata": {k: copy.deepcopy(tmeta[k]) for k in ("labels", "annotations")
                              if tmeta.get(k)},
                 "spec": {k: tspec[k] for k in ("serviceAccountName", "serviceAccount")
                          if tspec.get(k)}}
        for field_name in ("containers", "initContainers"):
            if tspec.get(field_name):
                small["spec"][field_name] = [_compact_container(c) for c in tspec[field_name]]
        selector = (spec.get("selector") or {}).get("matchLabels")
        out["spec"] = {"selector": {"matchLabels": dict(selector)}} if selector else {}
        if kind == "CronJob":
            out["spec"]["jobTemplate"] = {"spec": {"template": small}}
        else:
            out["spec"]["template"] = small
    return out


def _compact_container(c: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: c[k] for k in ("name", "restartPolicy") if k in c}
    ports = [{k: p[k] for k in ("containerPort", "name", "protocol") if k in p}
             for p in c.get("ports") or []]
    if ports:
        out["ports"] = ports
    for probe in _PROBES:
        http = (c.get(probe) or {}).get("httpGet")
        if http:
            out[probe] = {"httpGet": {k: http[k] for k in ("port", "path") if k in http}}
    env = [{"name": e["name"], "value": e.get("value")} for e in c.get("env") or []
           if e.get("name") == _PROBERS_ENV]
    if env:
        out["env"] = env
    return out


def _compact_pod(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The pod without what the inventory never reads (managedFields, conditions)."""
    out = {k: v for k, v in obj.items() if k != "metadata" and k != "status"}
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    status = {k: v for k, v in (obj.get("status") or {}).items() if k != "conditions"}
    out["metadata"], out["status"] = meta, status
    return copy.deepcopy(out)


class InventoryWatcher:
    """Keeps an :class:`Inventory` current from the API (see the module doc).

    ``namespaces`` None watches cluster-wide (``-A``). ``sleep`` waits between reconnects (the
    default wakes up on :meth:`stop`); ``clock`` stamps deletions seen without a timestamp.
    """

    def __init__(self, api: KubeApi, *, namespaces: Sequence[str] | None = None,
                 resources: Sequence[tuple[str, str, str]] = WATCHED,
                 timeout_seconds: int = WATCH_TIMEOUT,
                 backoff: Callable[[], Backoff] = Backoff,
                 clock: Callable[[], datetime] = _utcnow,
                 sleep: Callable[[float], None] | None = None,
                 listeners: Iterable[PodListener] = (),
                 resource_versions: Mapping[tuple[str, str | None], str] | None = None,
                 pods: Iterable[Mapping[str, Any]] = (),
                 objects: Iterable[Mapping[str, Any]] = ()) -> None:
        """Resume from a checkpoint: ``pods`` (raw objects, ended ones included) seed the
        history, the live ones as known to be alive; ``objects`` (the other kinds, from
        :meth:`inventory_state`) seed the rest; ``resource_versions`` ((resource, namespace
        or None) -> resourceVersion) makes those scopes watch from there instead of listing
        first (a 410 then lists, ends the seeded pods that vanished meanwhile and marks the
        other objects that did deleted). A scope should resume only if what it held at that
        resourceVersion is among ``pods``/``objects``."""
        self.api = api
        self.namespaces = None if namespaces is None else sorted(set(namespaces))
        self.resources = tuple(resources)
        self.timeout_seconds = timeout_seconds
        self.backoff = backoff
        self.clock = clock
        self.listeners = list(listeners)
        self.stats = WatchStats()
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._inventory = Inventory()
        self._changed = threading.Condition()
        self._alive: dict[tuple[str, str | None], dict[str, dict[str, Any]]] = {}
        self._versions: dict[tuple[str, str | None], str] = {}
        self._threads: list[threading.Thread] = []
        self._fatal: InventoryError | None = None
        self._resume = dict(resource_versions or {})
        self._seeded: list[dict[str, Any]] = []
        #: (resource, namespace or "", name) -> compact object (not pods)
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._changes = 0
        for obj in pods:
            self._seed_pod(obj)
        for obj in objects:
            self._seed_object(obj)

    def _seed_pod(self, obj: Mapping[str, Any]) -> None:
        pod = _compact_pod(obj)
        meta = pod["metadata"]
        self._inventory.add_object(pod, kind="Pod", origin="checkpoint")
        if _ended(pod):
            return
        ns_list: list[str | None] = [None] if self.namespaces is None else [*self.namespaces]
        for ns in ns_list:
            if ns is None or meta.get("namespace") == ns:
                self._alive.setdefault(("pods", ns), {})[str(meta.get("uid"))] = pod
                self._seeded.append(pod)

    def _seed_object(self, obj: Mapping[str, Any]) -> None:
        kind = str(obj.get("kind"))
        resource = RESOURCE_OF.get(kind)
        if resource is None or kind == "Pod":
            return
        self._inventory.add_object(obj, kind=kind, origin="checkpoint")
        self._objects[_object_key(resource, obj)] = dict(obj)

    # -- public -----------------------------------------------------------------------------
    def scopes(self) -> list[tuple[tuple[str, str, str], str | None]]:
        """(resource, namespace or None) of every watch loop."""
        ns_list: list[str | None] = [None] if self.namespaces is None else [*self.namespaces]
        return [(res, ns) for res in self.resources for ns in ns_list]

    def sync(self) -> None:
        """List everything once (synchronously): the inventory is complete on return. Scopes
        resumed from a ``resource_versions`` checkpoint are not listed (their watch resumes)."""
        seeded, self._seeded = self._seeded, []
        for obj in seeded:  # alive at the checkpoint: their logs are followed again
            self._notify("ADDED", obj)
        for res, ns in self.scopes():
            rv = self._resume.pop((res[2], ns), None)
            if rv is not None:
                with self._changed:
                    self._versions[(res[2], ns)] = rv
                continue
            self._relist(res, ns)

    def start(self) -> None:
        """:meth:`sync`, then one watch thread per scope."""
        self.sync()
        for res, ns in self.scopes():
            t = threading.Thread(target=self.run, args=(res, ns), daemon=True,
                                 name=f"watch-{res[2]}-{ns or 'all'}")
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loops (interrupting reads in progress) and wait for them."""
        self._stop.set()
        self.api.interrupt()
        for t in self._threads:
            t.join(timeout)

    @property
    def error(self) -> InventoryError | None:
        """The error that ended a loop (forbidden, not found, back-off exhausted), if any."""
        return self._fatal

    def snapshot(self) -> Inventory:
        """A copy of the inventory as of now (safe to use while the watches go on)."""
        with self._changed:
            return Inventory().merge(self._inventory)

    def resource_versions(self) -> dict[tuple[str, str | None], str]:
        """Where every watch stands ((resource, namespace or None) -> resourceVersion)."""
        with self._changed:
            return dict(self._versions)

    def inventory_state(self, forget_deleted_before: datetime | None = None
                        ) -> tuple[dict[tuple[str, str | None], str], list[dict[str, Any]]]:
        """Where every watch stands and the compact objects (all kinds but pods) as of there,
        taken together (for a checkpoint; pods come from the listeners, which have seen
        every event up to these resourceVersions). Deleted objects whose
        ``deletionTimestamp`` is before ``forget_deleted_before`` are left out from now on
        (the inventory of this run keeps them)."""
        with self._changed:
            if forget_deleted_before is not None:
                for key in [k for k, o in self._objects.items()
                            if _deleted_before(o, forget_deleted_before)]:
                    del self._objects[key]
            return dict(self._versions), [self._objects[k] for k in sorted(self._objects)]

    @property
    def changes(self) -> int:
        """Grows with every change of the inventory or of a resourceVersion."""
        with self._changed:
            return self._changes

    def resource_version(self, resource: str, namespace: str | None = None) -> str | None:
        """Where the watch of ``resource`` (``pods``...) stands."""
        with self._changed:
            return next((rv for (r, ns), rv in self._versions.items()
                         if r == resource and ns == namespace), None)

    def wait_for(self, predicate: Callable[[InventoryWatcher], bool],
                 timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (checked after every change) or timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    # -- one loop ---------------------------------------------------------------------------
    def run(self, res: tuple[str, str, str], ns: str | None) -> None:
        """Watch one scope until :meth:`stop` (or a fatal error, kept in :attr:`error`)."""
        backoff = self.backoff()
        resource = res[2]
        path, selector = self._path(res, ns)
        while not self._stop.is_set():
            try:
                rv = self._versions.get((resource, ns))
                if rv is None:
                    self._relist(res, ns)
                    continue
                for event in self.api.watch(path, rv, timeout_seconds=self.timeout_seconds,
                                            field_selector=selector):
                    self._apply(res, ns, event)
                    backoff.reset()
                    if self._stop.is_set():
                        return
            except ResourceGone as exc:
                log.info("%s: %s; listing again", path, exc)
                with self._changed:
                    self.stats.gone += 1
                    self._versions.pop((resource, ns), None)
                    self._changed.notify_all()
            except ApiUnavailable as exc:
                if self._stop.is_set():
                    return
                with self._changed:
                    self.stats.reconnects += 1
                    self.stats.error(exc)
                    self._changed.notify_all()
                delay = backoff.next_delay()
                if delay is None:
                    self._fail(InventoryError(
                        f"watch {path}: giving up after {backoff.failures - 1} failures: "
                        f"{exc.message}", origin=self.api.server,
                        hint="is the API server reachable?"))
                    return
                log.warning("%s: %s; reconnecting in %.1fs", path, exc, delay)
                self._sleep(delay)
            except InventoryError as exc:
                self._fail(exc)
                return

    def _fail(self, exc: InventoryError) -> None:
        with self._changed:
            self.stats.error(exc)
            self._fatal = self._fatal or exc
            self._changed.notify_all()

    def _path(self, res: tuple[str, str, str], ns: str | None) -> tuple[str, str | None]:
        kind, group, resource = res
        if kind == "Namespace":
            return resource_path(group, resource), (f"metadata.name={ns}" if ns else None)
        return resource_path(group, resource, ns), None

    def _relist(self, res: tuple[str, str, str], ns: str | None) -> None:
        """List the scope (paginated), apply it, end pods that vanished meanwhile."""
        kind, _, resource = res
        path, selector = self._path(res, ns)
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            query: list[tuple[str, Any]] = [("limit", PAGE_SIZE)]
            if token:
                query.append(("continue", token))
            if selector:
                query.append(("fieldSelector", selector))
            try:
                page = self.api.get_json(path, query)
            except ResourceGone:
                items, token = [], None  # continue token expired: start over
                continue
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
        now = self.clock()
        origin = f"{self.api.server}{path}"
        with self._changed:
            self.stats.lists += 1
            for obj in items:
                self._inventory.add_object(obj, kind=kind, origin=origin)
            if kind == "Pod":
                ended = self._reconcile_pods((resource, ns), items, now, origin)
            else:
                ended = []
                self._reconcile_objects(kind, ns, items, now)
            self._changes += 1
        for obj in ended:
            self._notify("DELETED", obj)
        if kind == "Pod":
            for obj in items:
                self._notify("ADDED", obj)
        # Set only now: a resourceVersion saved with the listeners' pod history is one they
        # have seen everything up to.
        self._set_version(resource, ns, str(meta.get("resourceVersion") or "0"))

    def _set_version(self, resource: str, ns: str | None, rv: str) -> None:
        with self._changed:
            self._versions[(resource, ns)] = rv
            self._changes += 1
            self._changed.notify_all()

    def _reconcile_objects(self, kind: str, ns: str | None, items: list[dict[str, Any]],
                           now: datetime) -> None:
        """Keep the listed objects; mark the known ones of this scope missing from the list
        (deleted while the watch was down) deleted at ``now``."""
        resource = RESOURCE_OF[kind]
        listed = set()
        for obj in items:
            key = _object_key(resource, obj)
            listed.add(key)
            self._objects[key] = compact_object(obj, kind)
        for key, obj in list(self._objects.items()):
            in_scope = (key[0] == resource
                        and (ns is None or (key[2] if kind == "Namespace" else key[1]) == ns))
            if in_scope and key not in listed and not (obj.get("metadata") or {}).get(
                    "deletionTimestamp"):
                self._objects[key] = _mark_deleted(obj, now)
                self.stats.vanished_objects += 1

    def _reconcile_pods(self, scope: tuple[str, str | None], items: list[dict[str, Any]],
                        now: datetime, origin: str) -> list[dict[str, Any]]:
        ended: list[dict[str, Any]] = []
        alive = self._alive.setdefault(scope, {})
        listed = {str((o.get("metadata") or {}).get("uid")): o for o in items}
        starts_by_ip: dict[str, list[datetime]] = {}
        for obj in items:
            status = obj.get("status") or {}
            start = _time(status.get("startTime")) or _time(
                (obj.get("metadata") or {}).get("creationTimestamp"))
            for ip in _ips(status):
                if start is not None:
                    starts_by_ip.setdefault(ip, []).append(start)
        for uid in sorted(set(alive) - set(listed)):
            gone = alive.pop(uid)
            started = _time((gone.get("status") or {}).get("startTime"))
            end = now
            for ip in _ips(gone.get("status") or {}):
                for s in starts_by_ip.get(ip, []):
                    if (started is None or s > started) and s < end:
                        end = s
            self._end_pod(gone, end, origin)
            ended.append(gone)
            self.stats.vanished += 1
        for uid, obj in listed.items():
            if _ended(obj):
                alive.pop(uid, None)
            else:
                alive[uid] = _compact_pod(obj)
        return ended

    def _end_pod(self, obj: dict[str, Any], end: datetime, origin: str) -> None:
        meta = obj.setdefault("metadata", {})
        if not meta.get("deletionTimestamp"):
            meta["deletionTimestamp"] = _rfc3339(end)
        self._inventory.add_object(obj, kind="Pod", origin=origin)

    def _apply(self, res: tuple[str, str, str], ns: str | None,
               event: Mapping[str, Any]) -> None:
        kind, _, resource = res
        etype = str(event.get("type"))
        obj = dict(event["object"])
        meta = obj.get("metadata") or {}
        origin = f"{self.api.server}{self._path(res, ns)[0]}"
        with self._changed:
            self.stats.events[etype] = self.stats.events.get(etype, 0) + 1
            if etype in ("ADDED", "MODIFIED", "DELETED"):
                if kind == "Pod":
                    uid = str(meta.get("uid"))
                    alive = self._alive.setdefault((resource, ns), {})
                    if etype == "DELETED" and not meta.get("deletionTimestamp"):
                        obj["metadata"] = {**meta,
                                           "deletionTimestamp": _rfc3339(self.clock())}
                    if etype == "DELETED" or _ended(obj):
                        alive.pop(uid, None)
                    else:
                        alive[uid] = _compact_pod(obj)
                else:
                    small = compact_object(obj, kind)
                    if etype == "DELETED":
                        small = _mark_deleted(small, self.clock())
                    self._objects[_object_key(resource, obj)] = small
                self._inventory.add_object(obj, kind=kind, origin=origin)
                self._changes += 1
        if kind == "Pod" and etype in ("ADDED", "MODIFIED", "DELETED"):
            self._notify(etype, obj)
        rv = meta.get("resourceVersion")
        if rv:  # after the listeners (see _relist)
            self._set_version(resource, ns, str(rv))

    def _notify(self, etype: str, obj: Mapping[str, Any]) -> None:
        for listener in self.listeners:
            listener(etype, obj)


def _object_key(resource: str, obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    ns = "" if resource == "namespaces" else str(meta.get("namespace") or "default")
    return (resource, ns, str(meta.get("name")))


def _mark_deleted(obj: Mapping[str, Any], when: datetime) -> dict[str, Any]:
    """A copy of ``obj`` with a ``deletionTimestamp`` (kept if it had one)."""
    meta = dict(obj.get("metadata") or {})
    meta.setdefault("deletionTimestamp", _rfc3339(when))
    return {**obj, "metadata": meta}


def _deleted_before(obj: Mapping[str, Any], limit: datetime) -> bool:
    try:
        t = _time((obj.get("metadata") or {}).get("deletionTimestamp"))
    except ValueError:
        return False
    return t is not None and t < limit


def _ips(status: Mapping[str, Any]) -> list[str]:
    ips = [str(e["ip"]) for e in status.get("podIPs") or [] if e and e.get("ip")]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    return ips


def _ended(obj: Mapping[str, Any]) -> bool:
    meta = obj.get("metadata") or {}
    phase = (obj.get("status") or {}).get("phase")
    return bool(meta.get("deletionTimestamp")) or phase in ("Succeeded", "Failed")
