"""bev3d: multi-camera 3D object detection (DETR3D, PETR) on nuScenes-format data."""

__version__ = "0.1.0"
