"""Model definitions (Llama family) and loaders (Hugging Face folders, GGUF files)."""
