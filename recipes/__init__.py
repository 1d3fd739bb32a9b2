"""Recipe files (YAML), installed as the package ``streaming_adapters.recipes`` so that Hydra finds them
with or without a source checkout."""
