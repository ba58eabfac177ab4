"""Built-in stages: every module in this package registers its stages on import.

Adding a stage is adding a module here (see :mod:`slimline.stage` for the contract).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
