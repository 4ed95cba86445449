"""RedNet: involution networks in PyTorch. See README.md."""

import importlib

from rednet.integrations import when_imported

# RedNet in timm's registry, registered only once timm is imported: timm costs seconds to import.
when_imported("timm", lambda: importlib.import_module("rednet.integrations.timm"))
