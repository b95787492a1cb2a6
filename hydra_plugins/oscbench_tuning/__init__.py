"""oscbench's tuning sweepers (oscbench.tune), where Hydra looks for plugins."""
