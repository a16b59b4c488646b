"""o_shared's TP-shard storage: plain TP's o_proj on every rank, FlashComm2's
weight all-gathered into a ring (``storage.py``; what is gathered: ``specs.py``;
the ring: ``ring.py``)."""
