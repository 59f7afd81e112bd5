"""Local multi-node Ray: node naming, process matching by temp dir, CPU shares, settings."""

from __future__ import annotations

import os

import pytest

from cluster.exceptions import SettingsError
from cluster.ray_nodes import _names_dir, node_name, node_resources
from cluster.settings import RaySettings, load_settings


def test_a_node_dir_matches_itself_not_a_sibling_sharing_its_prefix() -> None:
    d = "/tmp/framecast-ray-abc-w1"
    assert _names_dir(f"--temp-dir={d}", d)
    assert _names_dir(f"--raylet_socket_name={d}/session_x/sockets/raylet", d)
    assert _names_dir(f'--labels={{"x": "{d}"}}', d)
    assert not _names_dir("--temp-dir=/tmp/framecast-ray-abc-w10", d)
    assert not _names_dir("--temp-dir=/tmp/framecast-ray-abc-w12/session", d)


def test_node_names_and_resources() -> None:
    assert node_name(0) == "head"
    assert node_name(2) == "worker-2"
    assert node_resources(1) == {"framecast_node": 1.0, "framecast_node_worker-1": 1.0}


def test_cpu_shares() -> None:
    cores = os.cpu_count() or 1
    assert RaySettings().head_num_cpus is None  # one node: every core, as before
    assert RaySettings(nodes=3).head_num_cpus == max(1, cores // 3)
    assert RaySettings(nodes=3).worker_cpus == max(1, cores // 3)
    assert RaySettings(nodes=3, num_cpus=2, worker_num_cpus=4).head_num_cpus == 2
    assert RaySettings(nodes=3, num_cpus=2, worker_num_cpus=4).worker_cpus == 4


@pytest.mark.parametrize("nodes", [0, 17])
def test_a_bad_node_count_names_the_field(nodes: int) -> None:
    with pytest.raises(SettingsError, match=r"ray\.nodes"):
        load_settings(ray={"nodes": nodes})
