// Placeholder: filled in by the token merging CUDA kernel work.
