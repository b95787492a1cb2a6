"""Oscillation measurement (`oscbench.oscillation.tracker`) and the policies that act on
oscillating weights, one module each, registered in `oscbench.oscillation.policy.POLICIES`."""

from oscbench.registry import import_plugins

import_plugins(__name__, __path__)
