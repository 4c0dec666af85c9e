"""Process -> container and pod from cgroup paths, on paths real nodes printed.

Every sample is a line quoted in a public issue or pull request (cited above it): cgroup v1
and v2, containerd, CRI-O, Docker, systemd and cgroupfs drivers, kind and minikube nesting.
The expected ids are read off the sample itself (the pod UID in the slice name with ``_``
turned into ``-``, the 64-hex container id), which is what the kubelet's naming scheme says.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from observe.cgroup import (
    ContainerRef,
    ProcessCgroups,
    cgroup2_mount,
    parse_cgroup_path,
    parse_proc_cgroup,
    pods_by_uid,
)
from observe.inventory import Inventory

CRIO_ID = "5eed917563583925ffdbd40a64efb2aaffe58638e57add8becaf460fe74f5b1c"
DOCKER_K8S_ID = "d0b3604b67ac7930dd34ba3a796627e3e4717d12309e90a4afe3f38b6816ac98"
CONTAINERD_ID = "ee4b20e90ac7f42a10bd004d05646b13d8ab5e2c5e7cbc01abf8006bac016459"

SAMPLES: list[tuple[str, ContainerRef | None]] = [
    # CRI-O, systemd driver, cgroup v1 (github.com/opencontainers/runc/issues/4620)
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-poda5c1f8d5_1919_434d_add7_"
     f"4afaafdaef89.slice/crio-{CRIO_ID}.scope",
     ContainerRef(CRIO_ID, "cri-o", "a5c1f8d5-1919-434d-add7-4afaafdaef89")),
    # CRI-O's conmon: in the pod, not in the container (same issue)
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod207aaad1_659f_4db8_88e0_"
     "46e0cdcc3004.slice/crio-conmon-32da98c8522068be05a7510a3eddb09cad6ed2f03286180d0e931d0d0"
     "b6224a6.scope",
     ContainerRef(None, None, "207aaad1-659f-4db8-88e0-46e0cdcc3004")),
    # Docker (dockershim), systemd driver (github.com/lxc/lxc/issues/3890)
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7d4424e6_bb13_42f4_a47a_"
     f"45a4828bf54d.slice/docker-{DOCKER_K8S_ID}.scope",
     ContainerRef(DOCKER_K8S_ID, "docker", "7d4424e6-bb13-42f4-a47a-45a4828bf54d")),
    # containerd's "slice:prefix:id" written verbatim in v1 hierarchies
    # (github.com/open-telemetry/opentelemetry-java/issues/4507)
    (f"/kubepods-besteffort-pod0125ec2f_b64a_4868_8f5b_94b56cbab864.slice:cri-containerd:"
     f"{CONTAINERD_ID}",
     ContainerRef(CONTAINERD_ID, "containerd", "0125ec2f-b64a-4868-8f5b-94b56cbab864")),
    # kind, cgroup v2, containerd (github.com/containerd/nri/pull/227)
    ("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-"
     "besteffort-pod1e597579_417e_482f_bf65_5fe170c3aebd.slice/cri-containerd-a09bc17f5aa29b0db"
     "dec9ede5f46cf1396d2405917ab02e6f1eb1019f388396e.scope",
     ContainerRef("a09bc17f5aa29b0dbdec9ede5f46cf1396d2405917ab02e6f1eb1019f388396e",
                  "containerd", "1e597579-417e-482f-bf65-5fe170c3aebd")),
    # CRI-O sandbox cgroup without ".scope", cgroup v2 on OpenShift (same pull request)
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod35550f44_f691_427e_b57d_"
     "ab6127d2cb65.slice/crio-468f848e2ebec7203ed55748d08337851af589ac42eb551c572446a5c68fe631",
     ContainerRef("468f848e2ebec7203ed55748d08337851af589ac42eb551c572446a5c68fe631", "cri-o",
                  "35550f44-f691-427e-b57d-ab6127d2cb65")),
    # cgroupfs driver: /kubepods/<qos>/pod<uid>/<id> (github.com/siderolabs/talos/pull/3950)
    ("/kubepods/besteffort/pod18d34ce4-50c7-452c-9df8-53c4a3fdf363/a684bbdd0c4b6937b5ece9713bed"
     "661305ab0de570eb12b7c28a032aaf602937",
     ContainerRef("a684bbdd0c4b6937b5ece9713bed661305ab0de570eb12b7c28a032aaf602937", None,
                  "18d34ce4-50c7-452c-9df8-53c4a3fdf363")),
    # the pod's own cgroup, no container (same pull request)
    ("/kubepods/besteffort/pod7cac5881-7472-4dae-82e8-873bd8362bf5",
     ContainerRef(None, None, "7cac5881-7472-4dae-82e8-873bd8362bf5")),
    # minikube: a CRI-O node inside a Docker container - the inner container wins
    # (github.com/kubernetes/minikube/issues/11280)
    ("/docker/d6701ec289c56e4391acb11d07474b3139466857a305490575508a8b7a9fcf22/kubepods.slice/"
     "kubepods-besteffort.slice/kubepods-besteffort-pod2ca4a155_3599_498d_bb9d_4446693fa3ea."
     "slice/crio-358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c.scope",
     ContainerRef("358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c", "cri-o",
                  "2ca4a155-3599-498d-bb9d-4446693fa3ea")),
    # static pod: the kubelet's config hash, not an API UID (github.com/netdata/netdata/issues/4868)
    ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8daa50c3a64c9ff60bb9eab7b44"
     "b56fd.slice/cri-containerd-2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5"
     ".scope",
     ContainerRef("2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5",
                  "containerd", "8daa50c3a64c9ff60bb9eab7b44b56fd")),
    # plain Docker, cgroupfs (github.com/ctrsploit/ctrsploit/issues/280)
    ("/docker/2403ccfe427f1dc7b6120dccb9ac58c2f8456950380d587a9f33ea7f00dd303d",
     ContainerRef("2403ccfe427f1dc7b6120dccb9ac58c2f8456950380d587a9f33ea7f00dd303d", "docker",
                  None)),
    # not a container (same issue), the root, and a cgroup namespace's view of a pod
    ("/system.slice/containerd.service", None),
    ("/", None),
    ("/../../kubepods-besteffort-pod0125ec2f_b64a_4868_8f5b_94b56cbab864.slice/cri-containerd-"
     f"{CONTAINERD_ID}.scope",
     ContainerRef(CONTAINERD_ID, "containerd", "0125ec2f-b64a-4868-8f5b-94b56cbab864")),
]


@pytest.mark.parametrize(("path", "expected"), SAMPLES)
def test_cgroup_paths(path: str, expected: ContainerRef | None) -> None:
    assert parse_cgroup_path(path) == expected


def test_proc_cgroup_v1_file_picks_the_line_naming_the_container() -> None:
    # github.com/moby/moby/issues/33352: name=systemd stays at / while others name the container
    text = "\n".join([
        "13:pids:/", "12:hugetlb:/", "11:net_prio:/",
        "10:perf_event:/docker/5dace3de0735f73d2b5048f12d41a71741a02e49668de921fdae62f7e65dc498",
        "9:net_cls:/",
        "6:memory:/docker/5dace3de0735f73d2b5048f12d41a71741a02e49668de921fdae62f7e65dc498",
        "1:name=systemd:/",
    ])
    ref = parse_proc_cgroup(text)
    assert ref == ContainerRef("5dace3de0735f73d2b5048f12d41a71741a02e49668de921fdae62f7e65dc498",
                               "docker", None)
    # github.com/elastic/apm-nodejs-http-client/issues/164 (containerd, name=systemd line)
    one = ("1:name=systemd:/system.slice/containerd.service/kubepods-burstable-podff49d0be_16b7_"
           "4a49_bb9e_8ec1f1f4e27f.slice:cri-containerd:0f99ad5f45163ed14ab8eaf92ed34bb4a631d007"
           "f8755a7d79be614bcb0df0ef")
    ref = parse_proc_cgroup(one)
    assert ref is not None and ref.pod_uid == "ff49d0be-16b7-4a49-bb9e-8ec1f1f4e27f"
    assert parse_proc_cgroup("0::/\n") is None
    assert parse_proc_cgroup("garbage\n\n") is None


def test_process_lookup_reads_proc_and_caches(tmp_path: Path) -> None:
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0125ec2f_b64a_4868_"
        f"8f5b_94b56cbab864.slice/cri-containerd-{CONTAINERD_ID}.scope\n")
    cg = ProcessCgroups(proc_root=tmp_path, cgroup_root=tmp_path / "no-cgroup2")
    ref = cg.lookup(4242)
    assert ref is not None and ref.container_id == CONTAINERD_ID
    assert cg.lookup(4242) == ref and cg.proc_reads == 1
    assert cg.lookup(999_999) is None  # exited: nothing to read


def test_cgroup_id_is_looked_up_by_walking_the_hierarchy(tmp_path: Path) -> None:
    """The kernel's cgroup v2 id is the inode of the cgroup's directory: a process that
    already exited is still placed by the directory that outlives it."""
    scope = (tmp_path / "kubepods.slice" / "kubepods-pod0125ec2f_b64a_4868_8f5b_94b56cbab864"
             ".slice" / f"cri-containerd-{CONTAINERD_ID}.scope")
    scope.mkdir(parents=True)
    cg = ProcessCgroups(proc_root=tmp_path / "proc", cgroup_root=tmp_path, rescan_s=0)
    ref = cg.lookup(123, os.stat(scope).st_ino)
    assert ref == ContainerRef(CONTAINERD_ID, "containerd", "0125ec2f-b64a-4868-8f5b-94b56cbab864")
    assert cg.scans == 1
    assert cg.lookup(123, os.stat(scope).st_ino) == ref and cg.scans == 1  # cached


def test_this_machine_has_a_cgroup2_mount_where_mountinfo_says() -> None:
    root = cgroup2_mount()
    if root is not None:
        assert (root / "cgroup.procs").exists()


def test_pods_by_uid_uses_the_inventory() -> None:
    inventory = Inventory()
    inventory.add_object({"kind": "Pod", "metadata": {"name": "a", "namespace": "ns",
                                                      "uid": "u-1"}, "spec": {}, "status": {}})
    inventory.add_object({"kind": "Pod", "metadata": {"name": "b", "namespace": "ns"},
                          "spec": {}, "status": {}})
    assert pods_by_uid(inventory) == {"u-1": "ns/a"}
