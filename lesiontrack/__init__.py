"""LesionTrack: the composition root — console command and service wiring on top of the layers.

Layers (imports flow one way): ``dicom_node`` → ``pipeline`` → ``models``, with ``db`` and ``config``
beneath them. This package only assembles them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lesiontrack")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"
