"""LesionTrack: the composition root — console command and service wiring on top of the layers.

Layers (imports flow one way): ``dicom_node`` → ``pipeline`` → ``models``, with ``db`` and ``config``
beneath them. This package only assembles them.
"""

from lesiontrack.config.version import VERSION

__version__ = VERSION
