"""meterops: MLOps for meter and sensor streams.

The short public surface; everything else is reached through its module
(``meterops.bus.local``, ``meterops.sources.files``, ...).
"""

from meterops.errors import MeterOpsError
from meterops.pipeline import Pipeline
from meterops.settings import Settings, load_settings
from meterops.types import ReadingBatch

__all__ = ["MeterOpsError", "Pipeline", "ReadingBatch", "Settings", "__version__", "load_settings"]
__version__ = "0.1.0"
