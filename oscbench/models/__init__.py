"""Models, one module each, registered in `oscbench.models.base.MODELS`; `init_from=`
weights in `oscbench.models.pretrained`."""

from oscbench.registry import import_plugins

import_plugins(__name__, __path__)
