"""cmim's machine-learning library: plain PyTorch, no web, queue or database."""
