"""The core layer: model bundle and codec registry, text embeddings and token layout, sampling,
diffusion helpers, manifests, config, files, the run scaffold. Imports nothing above it."""
