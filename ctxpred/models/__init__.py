"""Net definitions as NetSpec code (prototxt/ is generated from them): the
context-prediction nets (``context``), the standard CaffeNet and VGG16 bodies
(``backbones``), Fast R-CNN (``fast_rcnn``) and VOC07 classification
(``classification``)."""
