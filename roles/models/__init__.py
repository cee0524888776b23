"""Model registry, shared building blocks, one file per architecture, and loaders (Hugging Face folders, GGUF files)."""
