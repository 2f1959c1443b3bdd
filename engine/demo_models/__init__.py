"""Built-in demo checkpoints `demo` and `demo-draft`, made by training/train_demo_models.py."""
