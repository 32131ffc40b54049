"""Pipeline stages: each module exposes ``run(config, ...) -> Result`` and is usable without the CLI."""
