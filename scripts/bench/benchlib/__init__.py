"""lazysnap benchmark harness: cold start and read throughput against overlayfs and the Go anchor."""
