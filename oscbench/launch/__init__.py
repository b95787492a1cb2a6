"""From a command line to trained runs: Hydra composition, the checked spec, a run built and
executed end to end, a sweep's GPU slots and tuning studies."""
