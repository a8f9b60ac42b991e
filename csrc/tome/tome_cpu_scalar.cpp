// Placeholder: filled in by the token merging CPU/CUDA kernel work.
