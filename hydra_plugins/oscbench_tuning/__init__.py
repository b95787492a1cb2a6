"""oscbench's tuning sweepers (oscbench.launch.tune), where Hydra looks for plugins."""
