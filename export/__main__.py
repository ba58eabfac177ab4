"""``python -m slimline.export ...``: the ``slimline profile`` command without the slimline package (and
so without torch), for deployment devices: ``python -m slimline.export model.onnx``,
``python -m slimline.export lut BLOCKS_DIR -o lut.json``."""

import sys

from .profile_cli import main_profile

sys.exit(main_profile())
