"""sppnet pipeline stages. Each module exposes ``run(cfg, run_dir, ...)`` and reads/writes only artifacts."""
