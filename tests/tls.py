"""A throwaway certificate authority for tests: the one ``framecast up --sasl`` makes.

The code lives in :mod:`cluster.tls`; tests keep their historical names.
"""

from __future__ import annotations

from cluster.tls import BrokerTLS, make_ca_and_keystore

ThrowawayCA = BrokerTLS

__all__ = ["ThrowawayCA", "make_ca_and_keystore"]
