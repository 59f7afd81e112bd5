"""The local multi-node Ray cluster (issue 20 items 1-2): nodes, placement, classifiers on Ray."""

from __future__ import annotations

from tests.conftest import LocalCluster


def test_session_cluster_has_three_nodes(ray_cluster: LocalCluster) -> None:
    import ray

    ids = ray_cluster.node_ids()
    assert len(set(ids)) == 3
    assert [w.name for w in ray_cluster.workers] == ["worker-1", "worker-2"]
    ray.init(address=ray_cluster.head.address, log_to_driver=False)
    try:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
    assert set(ids) == alive
