"""LightningModules: glue between stage models, optimisers, EMA and logging."""
