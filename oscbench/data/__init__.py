"""Datasets, one module each, registered in `oscbench.data.base.DATASETS`."""

from oscbench.registry import import_plugins

import_plugins(__name__, __path__)
