"""The numerical library shared by the stages (boxes, VOC I/O, networks, SPP pooling, AP, artifacts)."""
