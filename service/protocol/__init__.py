"""The protocol layer: what the Open Inference Protocol and V1 JSON mean, for any transport.

``handlers`` answers each operation (health, metadata, config, statistics, repository,
inference) from the models layer; the codecs turn request bodies into tensors and tensors
into response bodies, one module per protocol and form. Nothing here knows HTTP or gRPC:
a transport parses its own framing, calls these, and maps ``service.errors`` to its codes.
"""
