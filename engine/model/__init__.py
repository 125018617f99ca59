"""The base model: config, weights loading, the Llama-family forward, CUDA graphs."""
