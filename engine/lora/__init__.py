"""LoRA adapters: slot table (policy), host weights and the device slot pool."""
