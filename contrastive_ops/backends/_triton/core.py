"""Former name of :mod:`.sim_lse` (the sim_lse kernels and launchers), kept so that existing
imports keep working: ``core`` *is* the :mod:`.sim_lse` module object (setting an attribute
here sets it there)."""
import sys

from . import sim_lse as _sim_lse

sys.modules[__name__] = _sim_lse
