"""Token limits and quotas: the pure ledger and the distributed limiter over Table Storage."""
