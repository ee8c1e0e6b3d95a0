"""Old module path of ``RoIData``, kept for existing prototxt files."""
from ctxpred.detection.roi_data import RoIData  # noqa: F401
