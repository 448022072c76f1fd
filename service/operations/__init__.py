"""Operations: Prometheus metrics and Triton statistics (``metrics``), the access log
(``access``). What an operator reads; no request is answered here."""
