"""Operations: Prometheus metrics and Triton statistics (``metrics``), the access log
(``access``). What an operator reads; no request is answered here."""

# Where the worker processes' metric files go (prometheus-client's multiprocess mode). Here,
# not in ``metrics``: prometheus-client reads the variable once, when it is imported, so
# ``python -m service`` sets it before anything imports ``metrics`` (its workers are forked
# with prometheus-client already imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
