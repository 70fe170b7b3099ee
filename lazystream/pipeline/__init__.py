"""A whole diffusers pipeline whose large components are streamed, taking turns on the device.

``load``: :class:`LazyStreamPipeline` (diffusers assembles the pipeline from the streamed
components); ``keywords``: how diffusers' loading keywords apply to streamed components;
``phases``: :class:`Phases`, the components taking turns on the device.
"""

from .load import LazyStreamPipeline
from .phases import Phases, PhaseStats, phases_of

__all__ = ["LazyStreamPipeline", "PhaseStats", "Phases", "phases_of"]
