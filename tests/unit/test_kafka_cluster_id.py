"""KRaft cluster ids that kafka-storage's argument parser accepts."""

from __future__ import annotations

import base64

from cluster.kafka_broker import new_cluster_id


def test_cluster_ids_are_16_byte_uuids_that_never_look_like_an_option() -> None:
    # One id in 64 would start with "-" if drawn naively (base64url of random bytes): in 2,000
    # draws that is near certain, and kafka-storage then fails with "--cluster-id: expected
    # one argument" (seen once in CI).
    ids = [new_cluster_id() for _ in range(2000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids)
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)
