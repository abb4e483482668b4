"""The cluster: leader election with fencing, singleton channels, cluster config.

Everything here coordinates through ZooKeeper (kazoo) under the cluster's base
path (``zookeeper_chroot``, default ``/hl7bridge/<cluster>``); the znode layout
is :mod:`bridge.cluster.layout`. Znodes hold ids, versions, counts and
configuration only, never patient data.
"""
