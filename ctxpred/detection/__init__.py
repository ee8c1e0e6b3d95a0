"""Fast R-CNN detection on stock Caffe: VOC annotations and AP (``voc``); box overlap,
NMS and regression (``boxes``); the roidb (``roidb``) and the RoI data layer
(``roi_data``); RoI pooling and smooth L1 layers (``roi_layers``); proposals
(``proposals``); offline scenes (``synthetic_scenes``) and the offline detection set
made of them (``detection_set``); initial weights from a context model
(``init_weights``); a training and testing run (``run``)."""
