"""The models layer: repository versions loaded into engines (``runtime``), a dynamic
batcher per model (``batcher``), and the store that holds them and decides what is served
(``store``). Knows nothing of HTTP, gRPC or JSON."""
