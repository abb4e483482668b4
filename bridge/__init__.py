"""hl7bridge core: config, pipeline, normalization, Kafka publishing, ZooKeeper coordination."""

__version__ = "0.1.0"
