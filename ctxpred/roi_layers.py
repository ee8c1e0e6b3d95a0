"""Old module path of the RoI layers, kept for existing prototxt files."""
from ctxpred.detection.roi_layers import ROIPooling, SmoothL1Loss  # noqa: F401
